# Everything a deployed server runs, one concern a file. The VM test in ../tests
# boots all of them but ec2.nix, which only works on EC2. sops.nix sets options of sops-nix's
# module, which flake.nix imports beside this list (it comes from a flake input).
{
  imports = [
    ./ec2.nix
    ./nix.nix
    ./logging.nix
    ./ssh.nix
    ./firewall.nix
    ./web.nix
    ./upgrades.nix
    ./boot-guard.nix
    ./secrets.nix
    ./sops.nix
  ];
}
