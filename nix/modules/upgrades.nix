# Unattended upgrades, off unless a host file turns them on (staging does).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.nixosEc2;

  # What deploy/remote-switch.sh keeps on the host: it holds `lock` (fd 9) while it builds and
  # switches, and leaves a pending-* file non-empty from the switch until the deploy is
  # confirmed or rolled back. test/upgrades.test.ts compares these with that script.
  stateDir = "/var/lib/nixos-ec2";
  lockFile = "${stateDir}/lock";
  pendingFiles = [
    "${stateDir}/pending-rollback"
    "${stateDir}/pending-boot"
    "${stateDir}/pending-secrets"
  ];
  # As long as a deploy waits for the lock (remote-switch.sh's LOCK_WAIT_SECONDS).
  lockWaitSeconds = 600;

  # The release branch that flake.nix follows (github:NixOS/nixpkgs/nixos-YY.MM), written there once.
  nixpkgsBranch = (import ../flake.nix).inputs.nixpkgs.url;

  # Runs first in nixos-upgrade.service (`script` is types.lines in
  # nixos/lib/systemd-unit-options.nix, so mkBefore puts this ahead of the module's
  # `nixos-rebuild switch` line; the job script runs under `set -e`, nixos/lib/systemd-lib.nix).
  # The descriptor stays open, so the lock is held until the service's shell exits: through the
  # build and the switch. switch-to-configuration's own lock is non-blocking, so without this a
  # deploy and the upgrade switching at once would fail each other's switch, and the rollback.
  # Skipping exits 0: a failed unit would make the system "degraded", which fails a deploy's
  # confirmation. flock is util-linux's, which the unit's PATH lacks.
  # A host switched by hand was never deployed, so nothing made ${stateDir}: without it
  # `exec 9>>` fails and the failed unit leaves the system degraded. It is made as the deploy
  # makes it (nixos-deploy.sh: only if missing, umask 077).
  lockPreamble = ''
    lock_wait_seconds=${toString lockWaitSeconds}
    [ -d ${stateDir} ] || mkdir -m 0700 ${stateDir}
    exec 9>>${lockFile}
    if ! ${pkgs.util-linux}/bin/flock -n 9; then
      echo "nixos-ec2: a deploy or rollback holds ${lockFile}; waiting up to $lock_wait_seconds s"
      if ! ${pkgs.util-linux}/bin/flock -w "$lock_wait_seconds" 9; then
        echo "nixos-ec2: skipping tonight's upgrade: ${lockFile} is still held after $lock_wait_seconds s (a deploy is building or switching)"
        exit 0
      fi
    fi
    for pending in ${lib.concatStringsSep " " pendingFiles}; do
      if [ -s "$pending" ]; then
        echo "nixos-ec2: skipping tonight's upgrade: a deploy is waiting for its confirmation ($pending: $(head -c 200 "$pending"))"
        exit 0
      fi
    done
    echo "nixos-ec2: holding ${lockFile} until this upgrade ends; a deploy waits for it"
  '';
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
      switches the host back to the revision in flake.lock. The rebuild takes the
      deploy's lock and skips the night while a deploy awaits its confirmation'';
  };

  config = lib.mkIf cfg.autoUpgrade.enable {
    system.autoUpgrade = {
      enable = true;
      # The exact source of the running system (immutable, in the store), not a
      # working copy that could be half way through a deploy.
      flake = "path:${cfg.flake.source}#${cfg.flake.attr}";
      # nixos/modules/tasks/auto-upgrade.nix joins these unquoted into a shell line, after its
      # own `--refresh` (which fetches the branch head anew instead of a cached one). Nix
      # deprecated --update-input (an alias of `nix flake update`); --override-input points
      # nixpkgs at the branch for this build only and implies --no-write-lock-file.
      flags = [
        "--override-input"
        "nixpkgs"
        nixpkgsBranch
        "--no-write-lock-file"
        "--print-build-logs"
      ];
      dates = "04:40";
      randomizedDelaySec = "45min";
      # A kernel update waits for the next deploy or a manual reboot.
      allowReboot = false;
    };

    systemd.services.nixos-upgrade.script = lib.mkBefore lockPreamble;
  };
}
