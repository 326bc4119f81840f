# The parts that only make sense on an EC2 instance booted from the official NixOS AMI.
{ modulesPath, ... }:
{
  # The same module the AMI was built from: disk layout, boot loader (BIOS on
  # x86_64, EFI on aarch64), ENA driver, serial console, SSM agent, and the
  # services that read user-data (SSH host key) and the EC2 key pair.
  imports = [ (modulesPath + "/virtualisation/amazon-image.nix") ];

  # The flake is the only source of this system. Left on, amazon-init would turn
  # Nix-looking user-data into /etc/nixos/configuration.nix at boot and switch to
  # it, replacing what the deploy step installed. (apply-ec2-data, which installs
  # the SSH host key and the key pair, is a separate service and stays.)
  virtualisation.amazon-init.enable = false;

  # nixos-rebuild evaluates nixpkgs on the host itself; without swap a 1-2 GiB
  # instance is often OOM-killed half way through (NixOS/nix#2664).
  swapDevices = [
    {
      device = "/var/lib/swapfile";
      size = 2048;
    }
  ];

  # Nobody reads man pages on these servers, and building them costs time and
  # store space on every rebuild.
  documentation.enable = false;
}
