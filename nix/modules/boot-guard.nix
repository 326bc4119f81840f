# The boot half of the deploy's rollback across a reboot (deploy/remote-switch.sh). When a
# change cannot be switched to live, the deploy boots the new generation ONCE (GRUB's one-shot
# next_entry) and leaves the previous one the default. This unit runs at every boot, before sshd:
# in the boot a deploy waits for, it arms the same rollback timer a live switch has, so a new
# system that is not confirmed in time reboots into the previous generation by itself; in any
# other boot after such a deploy (the new system panicked, or the host was rebooted from outside)
# it records that the deploy was rolled back. A live switch that was not confirmed when the host
# rebooted is rolled back too (GRUB's default is then the unconfirmed system). The deploy refuses
# to reboot into a system that lacks this unit.
{ config, pkgs, ... }:
let
  # deploy/nixos-deploy.sh installs remote-switch.sh here (DEFAULT_STATE_DIR).
  stateDir = "/var/lib/nixos-ec2";
  # grub-editenv sets and clears next_entry. GRUB's module puts GRUB on PATH only for BIOS
  # installs (nixos/modules/system/boot/loader/grub/grub.nix: grub = null when the device is
  # "nodev", as on the aarch64 EFI image), so the deploy gets it from here on both.
  grub = if pkgs.stdenv.hostPlatform.isAarch64 then pkgs.grub2_efi else pkgs.grub2;
in
{
  environment.systemPackages = [ grub ];

  systemd.services.nixos-ec2-boot-guard = {
    description = "nixos-ec2: arm the rollback of a deploy's trial boot";
    wantedBy = [ "multi-user.target" ];
    # Armed before anyone can log in and confirm.
    before = [ "sshd.service" ];
    # Only while a deploy waits for its confirmation: a boot on trial, or a live switch that the
    # host rebooted before it was confirmed (which is then rolled back). "|": either will do.
    unitConfig.ConditionFileNotEmpty = [
      "|${stateDir}/pending-boot"
      "|${stateDir}/pending-rollback"
    ];
    path = [
      config.nix.package
      config.systemd.package
      grub
      pkgs.coreutils
      pkgs.util-linux
    ];
    serviceConfig = {
      Type = "oneshot";
      ExecStart = "${pkgs.bash}/bin/bash ${stateDir}/bin/remote-switch.sh boot-guard";
      TimeoutStartSec = "60s";
    };
  };
}
