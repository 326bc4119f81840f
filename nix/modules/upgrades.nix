# Unattended upgrades, off unless a host file turns them on (staging does).
{ config, lib, ... }:
let
  cfg = config.nixosEc2;
in
{
  options.nixosEc2 = {
    flake = {
      source = lib.mkOption {
        type = lib.types.str;
        description = "Store path of the flake this system was built from; flake.nix sets it.";
      };
      attr = lib.mkOption {
        type = lib.types.str;
        description = "This host's name under nixosConfigurations; flake.nix sets it.";
      };
    };

    autoUpgrade.enable = lib.mkEnableOption ''
      a nightly rebuild of this host from the deployed configuration with nixpkgs
      moved to the head of its release branch, so that an upstream change that
      breaks the server shows up here before it is pinned for production. A deploy
      switches the host back to the revision in flake.lock'';
  };

  config.system.autoUpgrade = lib.mkIf cfg.autoUpgrade.enable {
    enable = true;
    # The exact source of the running system (immutable, in the store), not a
    # working copy that could be half way through a deploy.
    flake = "path:${cfg.flake.source}#${cfg.flake.attr}";
    flags = [
      "--update-input"
      "nixpkgs"
      "--no-write-lock-file"
      "--print-build-logs"
    ];
    dates = "04:40";
    randomizedDelaySec = "45min";
    # A kernel update waits for the next deploy or a manual reboot.
    allowReboot = false;
  };
}
