{
  description = "The NixOS servers that nixos-ec2 deploys to AWS EC2";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
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
            awscli2
            nixfmt
            nodejs_22
            openssh
            pulumi
            shellcheck
          ];
        };
      });

      formatter = forSystems devSystems (pkgs: pkgs.nixfmt-tree);

      checks = forSystems testSystems (pkgs: {
        web = import ./tests/web.nix { inherit pkgs; };
      });
    };
}
