# sops-nix, for teams that keep secrets in git, encrypted: off until a host sets
# nixosEc2.sops.enable. The host's file is ../secrets/<flakeAttr>.yaml, encrypted with sops to that
# host's age recipient (derived from its SSH host key, which the stack generated: the stack output
# ageRecipients) and to the admins'; `npm run sops-config` writes the rules into .sops.yaml. On
# the host, sops-nix decrypts it at activation with the SSH host key, so nothing has to be copied
# to the host first. flake.nix imports sops-nix's own module next to this one; that module does
# nothing while no sops.secrets are set (Mic92/sops-nix modules/sops/default.nix: mkIf
# (cfg.secrets != { })).
{ config, lib, ... }:
let
  cfg = config.nixosEc2.sops;
  # The only host key (nix/modules/ssh.nix), installed from user-data before sshd first starts.
  hostKey = "/etc/ssh/ssh_host_ed25519_key";
in
{
  options.nixosEc2.sops = {
    enable = lib.mkEnableOption ''
      sops-nix with this host's file of secrets, decrypted on the host with its SSH host key.
      Declare each secret as sops-nix does (sops.secrets.<name>, with its owner and
      restartUnits); it appears in /run/secrets/<name>'';
    file = lib.mkOption {
      type = lib.types.path;
      default = ../secrets + "/${config.nixosEc2.flake.attr}.yaml";
      defaultText = "../secrets/<flakeAttr>.yaml";
      description = "The sops file of this host's secrets; .sops.yaml has a rule for it.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = builtins.pathExists cfg.file;
        message = "nixosEc2.sops.enable is set, but ${toString cfg.file} does not exist: run `npm run sops-config -- <stack>`, then create it with `sops nix/secrets/${config.nixosEc2.flake.attr}.yaml` in the dev shell.";
      }
    ];
    sops.defaultSopsFile = cfg.file;
    sops.age.sshKeyPaths = [ hostKey ];
    # No GPG: the ED25519 host key is the only key.
    sops.gnupg.sshKeyPaths = [ ];
  };
}
