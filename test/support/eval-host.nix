# Evaluates the modules of one nixosConfigurations host of the flake in nixDir, without nixpkgs:
#
# - the host's module list is the one flake.nix hands to lib.nixosSystem (read with a stand-in
#   that returns its arguments), and path imports are followed; imports from modulesPath (the
#   EC2 image module) are nixpkgs' and left out;
# - option values (config.nixosEc2.*) are the defaults the modules declare, then what the
#   modules set under nixosEc2 without mkIf (the host file, flake.nix's inline module), then
#   `overrides` (JSON) from the test;
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
  optionValues = builtins.foldl' update { } (
    map (m: defaultsOf ((m.value.options or { }).nixosEc2 or { })) modules
    ++ map (m: plainValues ((definitionsOf m).nixosEc2 or { })) modules
    ++ [ (builtins.fromJSON overrides) ]
  );

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
  options = plain optionValues;
  config = plain (builtins.foldl' (merge [ ]) { } (map (m: resolve (definitionsOf m)) modules));
}
