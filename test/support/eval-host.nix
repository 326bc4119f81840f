# Evaluates the modules of one nixosConfigurations host of the flake in nixDir, without nixpkgs:
#
# - the host's module list is the one flake.nix hands to lib.nixosSystem (read with a stand-in
#   that returns its arguments), and path imports are followed; imports from modulesPath (the
#   EC2 image module) are nixpkgs' and left out;
# - option values (config.nixosEc2.*) follow the options the modules declare, as in nixpkgs'
#   lib/modules.nix: for each declared option its default, then every module's definitions at its
#   path (mkIf and mkMerge applied on the way, a condition read only where the definition reaches
#   the option, as pushDownProperties leaves it), then `overrides` (JSON) from the test; an
#   attrsOf-submodule option's entries get the submodule's option defaults;
# - `config` is every module's definitions merged, with mkIf and mkMerge applied; mkOrder and
#   mkOverride stay as markers. Lists concatenate, equal values agree, other clashes throw.
#
# Only nixosEc2.* (and the stand-ins nix.package and systemd.package) can be read from the config
# the modules get: anything else is nixpkgs'.
{
  nixDir,
  host,
  overrides,
  pkgs,
}:
let
  dir = /. + nixDir;
  lib = import ./stand-in-lib.nix;
  flake = import (dir + "/flake.nix");

  outputs = flake.outputs {
    self = outputs // {
      outPath = "/nix/store/stand-in-source";
    };
    nixpkgs = {
      lib.nixosSystem = args: args;
      legacyPackages = throw "the host's modules evaluated nixpkgs.legacyPackages";
    };
    # sops-nix's module declares only nixpkgs-side options (sops.*), which nothing here reads.
    sops-nix.nixosModules.sops = { };
  };
  hostArgs = outputs.nixosConfigurations.${host};

  moduleArgs = {
    config = {
      nixosEc2 = optionValues;
      # nixpkgs' own options that a module reads, as stand-ins.
      nix.package = "/nix-package";
      systemd.package = "/systemd-package";
    };
    inherit lib;
    pkgs = builtins.fromJSON pkgs;
    options = { };
    modulesPath = "/modules-path";
  };

  expand =
    module:
    let
      value =
        let
          m = if builtins.isPath module then import module else module;
        in
        if builtins.isFunction m then m moduleArgs else m;
    in
    [
      {
        file = if builtins.isPath module then toString module else "<inline>";
        inherit value;
      }
    ]
    ++ builtins.concatMap expand (builtins.filter builtins.isPath (value.imports or [ ]));
  modules = builtins.concatMap expand hostArgs.modules;

  structuralKeys = [
    "_file"
    "config"
    "disabledModules"
    "imports"
    "key"
    "meta"
    "options"
  ];
  isShaped = m: m.value ? options || m.value ? config;
  definitionsOf = m: if isShaped m then m.value.config or { } else removeAttrs m.value structuralKeys;

  absent = {
    _type = "absent";
  };
  isAbsent = v: builtins.isAttrs v && (v._type or null) == "absent";
  isPlainAttrs = v: builtins.isAttrs v && !(v ? _type);
  filterAbsent =
    attrs:
    removeAttrs attrs (builtins.filter (name: isAbsent attrs.${name}) (builtins.attrNames attrs));

  # Applies mkIf and mkMerge; keeps mkOrder and mkOverride with their content resolved.
  resolve =
    v:
    let
      type = if builtins.isAttrs v then v._type or null else null;
    in
    if type == "if" then
      (if v.condition then resolve v.content else absent)
    else if type == "merge" then
      builtins.foldl' (merge [ ]) absent (map resolve v.contents)
    else if type == "order" || type == "override" then
      v // { content = resolve v.content; }
    else if type != null then
      v
    else if builtins.isAttrs v then
      filterAbsent (builtins.mapAttrs (_: resolve) v)
    else
      v;

  merge =
    path: a: b:
    if isAbsent a then
      b
    else if isAbsent b then
      a
    else if isPlainAttrs a && isPlainAttrs b then
      a
      // b
      // builtins.mapAttrs (name: _: merge (path ++ [ name ]) a.${name} b.${name}) (
        builtins.intersectAttrs a b
      )
    else if builtins.isList a && builtins.isList b then
      a ++ b
    else if a == b then
      a
    else
      throw "stand-in: conflicting definitions of ${builtins.concatStringsSep "." path}";

  # Options: the declared defaults (an option without one is left out, as NixOS leaves it
  # undefined), nested as declared.
  defaultsOf =
    options:
    if (options._type or null) == "option" then
      (if options ? default then options.default else absent)
    else
      filterAbsent (builtins.mapAttrs (_: defaultsOf) options);
  plainValues =
    v:
    if builtins.isAttrs v && (v._type or null) == "override" then
      plainValues v.content
    else if isPlainAttrs v then
      filterAbsent (builtins.mapAttrs (_: plainValues) v)
    else if builtins.isAttrs v then
      absent
    else
      v;
  update =
    a: b:
    if isPlainAttrs a && isPlainAttrs b then
      a // b // builtins.mapAttrs (name: _: update a.${name} b.${name}) (builtins.intersectAttrs a b)
    else
      b;

  isOption = v: builtins.isAttrs v && (v._type or null) == "option";
  # Every module's option declarations under nixosEc2, merged: a tree whose leaves are options.
  declared = builtins.foldl' update { } (map (m: (m.value.options or { }).nixosEc2 or { }) modules);

  # The definitions that one module's value makes at `path`. An mkIf's condition is read only when
  # its content reaches `path`, so a definition may depend on other options.
  definitionsAt =
    path: v:
    let
      type = if builtins.isAttrs v then v._type or null else null;
      name = builtins.head path;
    in
    if type == "if" then
      (
        let
          inner = definitionsAt path v.content;
        in
        if inner == [ ] then [ ] else if v.condition then inner else [ ]
      )
    else if type == "merge" then
      builtins.concatMap (definitionsAt path) v.contents
    else if type == "override" && path != [ ] then
      definitionsAt path v.content
    else if path == [ ] then
      [ v ]
    else if type == null && builtins.isAttrs v && v ? ${name} then
      definitionsAt (builtins.tail path) v.${name}
    else
      [ ];

  submoduleDefaults =
    type: name:
    let
      module = type.modules;
      value = if builtins.isFunction module then module { inherit name lib; config = { }; } else module;
    in
    defaultsOf (value.options or { });
  withSubmoduleDefaults =
    option: value:
    let
      type = option.type or { };
    in
    if (type.name or null) == "attrsOf" && (type.elemType.name or null) == "submodule" && isPlainAttrs value then
      builtins.mapAttrs (name: update (submoduleDefaults type.elemType name)) value
    else
      value;

  valueOf =
    path: option:
    let
      definitions =
        builtins.concatMap (m: definitionsAt ([ "nixosEc2" ] ++ path) (definitionsOf m)) modules
        ++ definitionsAt path (builtins.fromJSON overrides);
      values = builtins.filter (v: !isAbsent v) (map (d: plainValues (resolve d)) definitions);
    in
    withSubmoduleDefaults option (
      builtins.foldl' update (if option ? default then option.default else absent) values
    );
  # Every declared option is there, as in NixOS: the names come from the declarations alone, so a
  # value may depend on another option. One neither defaulted nor defined reads as `absent`.
  valuesOf =
    path: declarations:
    if isOption declarations then
      valueOf path declarations
    else
      builtins.mapAttrs (name: valuesOf (path ++ [ name ])) declarations;
  optionValues = valuesOf [ ] declared;
  withoutAbsent = v: if isPlainAttrs v then filterAbsent (builtins.mapAttrs (_: withoutAbsent) v) else v;

  # Paths become strings, as they would be interpolated.
  plain =
    v:
    if builtins.isPath v then
      toString v
    else if builtins.isFunction v then
      "<function>"
    else if builtins.isAttrs v then
      builtins.mapAttrs (_: plain) v
    else if builtins.isList v then
      map plain v
    else
      v;
in
{
  modules = map (m: m.file) modules;
  options = plain (withoutAbsent optionValues);
  config = plain (builtins.foldl' (merge [ ]) { } (map (m: resolve (definitionsOf m)) modules));
}
