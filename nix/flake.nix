{
  description = "The NixOS servers that nixos-ec2 deploys to AWS EC2";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
  # Secrets kept in git, encrypted with sops (nix/modules/sops.nix); off until a host uses it.
  inputs.sops-nix.url = "github:Mic92/sops-nix";
  inputs.sops-nix.inputs.nixpkgs.follows = "nixpkgs";

  outputs =
    {
      self,
      nixpkgs,
      sops-nix,
    }:
    let
      # One line per host of the Pulumi stacks: its flakeAttr, and the platform of its
      # instance type (Graviton types such as t4g, m7g or c7gn are "aarch64-linux").
      # Each host also has its own file, ./hosts/<name>.nix.
      hosts = {
        staging = "x86_64-linux";
        prod = "x86_64-linux";
      };

      # Where people run `nix develop` and `nix fmt`.
      devSystems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      # NixOS VM tests boot Linux guests, so they need a Linux builder (with KVM).
      testSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forSystems =
        systems: f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      nixosConfigurations = builtins.mapAttrs (
        name: system:
        nixpkgs.lib.nixosSystem {
          inherit system;
          modules = [
            ./modules
            sops-nix.nixosModules.sops
            ./hosts/${name}.nix
            {
              networking.hostName = name;
              nixosEc2.flake = {
                source = "${self}";
                attr = name;
              };
            }
          ];
        }
      ) hosts;

      devShells = forSystems devSystems (pkgs: {
        default = pkgs.mkShellNoCC {
          packages = with pkgs; [
            age
            awscli2
            nixfmt
            nodejs_22
            openssh
            pulumi
            shellcheck
            sops
            ssh-to-age
          ];
        };
      });

      formatter = forSystems devSystems (pkgs: pkgs.nixfmt-tree);

      checks = forSystems testSystems (pkgs: {
        web = import ./tests/web.nix {
          inherit pkgs;
          sopsModule = sops-nix.nixosModules.sops;
        };
      });
    };
}
