# Open ports: 22 for SSH, plus the public ports that ../network.json lists. The AWS
# security group reads the same file, so the two cannot drift apart.
#
# Uses builtins only, so that the tests can evaluate the port list without nixpkgs.
{ ... }:
let
  network = builtins.fromJSON (builtins.readFile ../network.json);
in
{
  networking.firewall = {
    enable = true;
    allowedTCPPorts = [ 22 ] ++ network.publicTcpPorts;
  };
}
