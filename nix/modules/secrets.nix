# Host secrets from the Pulumi stack (nixos-ec2:hostSecrets, each value a Pulumi secret): the
# deploy writes each secret a host gets to /var/lib/nixos-ec2/secrets/<name> (root, 0400, in a
# 0700 directory) before it activates the new system, and keeps it out of the Nix store.
#
# A module says here which units use a secret:
#
#   nixosEc2.secrets.webAdmin.restartUnits = [ "nginx.service" ];
#
# Each of those services then gets it with systemd's LoadCredential=, as
# $CREDENTIALS_DIRECTORY/webAdmin (/run/credentials/nginx.service/webAdmin), readable by the
# service's own user although the file is root's; and the deploy restarts exactly them when the
# secret changes, also when nothing else in the system did. Every secret a host's configuration
# names here must reach that host: the deploy refuses, before changing anything, a system that
# uses a secret the stack does not give the host.
{ config, lib, ... }:
let
  cfg = config.nixosEc2.secrets;

  # deploy/remote-switch.sh keeps the secrets in use there (SECRETS_LINK, under its STATE_DIR).
  secretsDir = "/var/lib/nixos-ec2/secrets";
  # deploy/remote-switch.sh reads it (SECRET_UNITS_FILE) from a new system before activating it,
  # and to know which units to restart.
  unitsFile = "nixos-ec2/secret-units";
  # In a boot that tries a new system (nix/modules/boot-guard.nix), this unit puts its secrets in
  # place; the units that load them start after it.
  bootGuard = "nixos-ec2-boot-guard.service";
  # The same pattern as SECRET_NAME_PATTERN in lib/hostSecrets.ts (a test keeps them equal).
  namePattern = "[A-Za-z][A-Za-z0-9_-]{0,62}";
  # A unit name with its type (systemd.unit(5)): "nginx" alone would get no credential and no
  # ordering, and `systemctl restart` would take it for nginx.service anyway.
  unitPattern = "[A-Za-z0-9:_.@\\-]+\\.(service|socket|timer|target|path|mount|automount|swap|slice|scope)";

  secretOptions =
    { name, ... }:
    {
      options = {
        restartUnits = lib.mkOption {
          type = lib.types.listOf lib.types.str;
          default = [ ];
          example = [ "nginx.service" ];
          description = ''
            Units that use this secret: each service among them loads it with
            LoadCredential= (unless loadCredential is false), starts after the boot guard, and
            is restarted by the deploy when the secret changes.
          '';
        };
        loadCredential = lib.mkOption {
          type = lib.types.bool;
          default = true;
          description = ''
            Give each service of restartUnits the secret as the credential named after it
            (LoadCredential=<name>:<path>). Off for a unit that reads `path` itself (as root).
          '';
        };
        path = lib.mkOption {
          type = lib.types.str;
          readOnly = true;
          default = "${secretsDir}/${name}";
          description = "Where the secret is on the host (root only, 0400), e.g. for LoadCredential= of another unit.";
        };
        credential = lib.mkOption {
          type = lib.types.str;
          readOnly = true;
          default = "${name}:${secretsDir}/${name}";
          description = "The LoadCredential= value that loads this secret under its own name.";
        };
      };
    };

  services =
    secret: builtins.filter (u: lib.hasSuffix ".service" u) cfg.${secret}.restartUnits;
  serviceSettings =
    secret: unit:
    {
      ${lib.removeSuffix ".service" unit} = {
        after = [ bootGuard ];
        serviceConfig.LoadCredential = lib.optional cfg.${secret}.loadCredential cfg.${secret}.credential;
      };
    };
in
{
  options.nixosEc2.secrets = lib.mkOption {
    type = lib.types.attrsOf (lib.types.submodule secretOptions);
    default = { };
    description = ''
      The host secrets this system uses (nixos-ec2:hostSecrets gives them to hosts), by name.
    '';
  };

  config = lib.mkIf (cfg != { }) {
    assertions =
      map (secret: {
        assertion = builtins.match namePattern secret != null;
        message = "nixosEc2.secrets.${secret}: a secret's name matches ${namePattern} (it is also a file name and a credential ID).";
      }) (builtins.attrNames cfg)
      ++ builtins.concatMap (
        secret:
        map (unit: {
          assertion = builtins.match unitPattern unit != null;
          message = "nixosEc2.secrets.${secret}.restartUnits: ${builtins.toJSON unit} is not a unit name with its type; write e.g. \"nginx.service\".";
        }) cfg.${secret}.restartUnits
      ) (builtins.attrNames cfg);

    # "<secret> <unit>..." a line, sorted by secret.
    environment.etc.${unitsFile}.text = lib.concatMapStringsSep "\n" (
      secret: lib.concatStringsSep " " ([ secret ] ++ cfg.${secret}.restartUnits)
    ) (builtins.attrNames cfg) + "\n";

    systemd.services = lib.mkMerge (
      builtins.concatMap (secret: map (serviceSettings secret) (services secret)) (builtins.attrNames cfg)
    );
  };
}
