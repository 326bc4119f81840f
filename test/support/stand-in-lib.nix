# The part of nixpkgs' lib that the flake's modules use, for evaluating them without nixpkgs.
# Module-system properties keep nixpkgs' shapes (lib/modules.nix: mkIf is
# { _type = "if"; condition; content; }, mkMerge { _type = "merge"; contents; }, mkOverride
# { _type = "override"; priority; content; }, mkOrder { _type = "order"; priority; content; }),
# so a test sees what a module asks of the module system. Option types are names only: nothing
# here checks a definition against its type.
let
  mkOption = args: { _type = "option"; } // args;
  optionType = name: extra: { _type = "option-type"; inherit name; } // extra;
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkOrder = priority: content: {
    _type = "order";
    inherit priority content;
  };
  # lib/strings.nix: unchanged when made of safe characters, else single-quoted.
  escapeShellArg =
    arg:
    let
      string = toString arg;
    in
    if builtins.match "[[:alnum:],._+:@%/-]+" string == null then
      "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] string}'"
    else
      string;
in
{
  inherit mkOption mkOverride mkOrder escapeShellArg;
  mkEnableOption =
    name:
    mkOption {
      type = optionType "bool" { };
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };
  types = {
    bool = optionType "bool" { };
    int = optionType "int" { };
    port = optionType "port" { };
    str = optionType "str" { };
    lines = optionType "lines" { };
    nullOr = elemType: optionType "nullOr" { inherit elemType; };
    listOf = elemType: optionType "listOf" { inherit elemType; };
    attrsOf = elemType: optionType "attrsOf" { inherit elemType; };
    path = optionType "path" { };
    # The module (a function of { name, ... } or an attribute set) whose options each entry has.
    submodule = modules: optionType "submodule" { inherit modules; };
  };

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  mkBefore = mkOrder 500;
  mkAfter = mkOrder 1500;

  optional = condition: value: if condition then [ value ] else [ ];
  optionals = condition: values: if condition then values else [ ];
  optionalAttrs = condition: attrs: if condition then attrs else { };
  optionalString = condition: string: if condition then string else "";
  concatStringsSep = builtins.concatStringsSep;
  concatMapStringsSep = separator: f: list: builtins.concatStringsSep separator (map f list);
  escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
  # lib/strings.nix
  hasSuffix =
    suffix: content:
    let
      n = builtins.stringLength content;
      k = builtins.stringLength suffix;
    in
    n >= k && builtins.substring (n - k) k content == suffix;
  removeSuffix =
    suffix: content:
    let
      n = builtins.stringLength content;
      k = builtins.stringLength suffix;
    in
    if n >= k && builtins.substring (n - k) k content == suffix then builtins.substring 0 (n - k) content else content;
}
