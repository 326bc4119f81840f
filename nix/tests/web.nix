# Boots the server configuration without its EC2-only module and checks it from a
# second machine, as a visitor (or an attacker) sees it. Needs Linux with KVM:
# `nix flake check` runs it as checks.<system>.web.
{ pkgs }:
pkgs.testers.runNixOSTest {
  name = "nixos-ec2-web";

  nodes = {
    server =
      { pkgs, ... }:
      {
        # Every module of a deployed server except the EC2 image, which expects EC2's
        # disks and metadata service.
        imports = [ ../modules ];
        disabledModules = [ ../modules/ec2.nix ];

        # A user whose password sshd must refuse although it is the right one: the test
        # then proves the policy, not a wrong guess. (Not root: PermitRootLogin alone
        # would refuse a root password.)
        users.users.alice = {
          isNormalUser = true;
          password = "correct horse battery staple";
        };

        # Something listening on a port the firewall does not list.
        systemd.services.unlisted-port = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig.ExecStart = "${pkgs.netcat}/bin/nc -lk 8080";
        };
      };

    client =
      { pkgs, ... }:
      {
        environment.systemPackages = [
          pkgs.curl
          pkgs.netcat
          pkgs.sshpass
        ];
      };
  };

  testScript = ''
    ssh_opts = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"


    def http_status(url, options=""):
        return client.succeed(f"curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}' {options} {url}").strip()


    start_all()
    server.wait_for_unit("nginx.service")
    server.wait_for_unit("sshd.service")
    server.wait_for_open_port(80)
    server.wait_for_open_port(22)
    server.wait_for_open_port(8080)
    client.wait_for_unit("multi-user.target")

    with subtest("the TODO page is served on /"):
        page = client.succeed("curl --fail --silent --show-error http://server/")
        assert "<title>TODO</title>" in page, page
        assert 'id="add"' in page, page

    with subtest("/healthz answers ok, from outside and on loopback"):
        assert client.succeed("curl -fsS http://server/healthz") == "ok\n"
        assert server.succeed("curl -fsS http://127.0.0.1/healthz") == "ok\n"

    with subtest("the firewall lets 80 and 22 through and drops unlisted ports"):
        client.succeed("nc -z -w 5 server 80")
        client.succeed("nc -z -w 5 server 22")
        client.fail("nc -z -w 5 server 8080")

    with subtest("SSH refuses passwords, even the right one"):
        out = client.fail(
            "sshpass -p 'correct horse battery staple' ssh " + ssh_opts
            + " -o PubkeyAuthentication=no"
            + " -o PreferredAuthentications=password,keyboard-interactive"
            + " alice@server true 2>&1"
        )
        assert "Permission denied" in out, out

    with subtest("root logs in with the key EC2 writes to /root/.ssh/authorized_keys"):
        client.succeed("mkdir -p -m 700 /root/.ssh")
        client.succeed("ssh-keygen -q -t ed25519 -N \"\" -f /root/.ssh/id_ed25519")
        public_key = client.succeed("cat /root/.ssh/id_ed25519.pub").strip()
        server.succeed("mkdir -p -m 700 /root/.ssh")
        server.succeed(f"echo '{public_key}' > /root/.ssh/authorized_keys")
        client.succeed("ssh " + ssh_opts + " -o BatchMode=yes root@server true")

    with subtest("sshd offers only its ed25519 host key, the one on disk"):
        server.fail("test -e /etc/ssh/ssh_host_rsa_key")
        on_disk = server.succeed("cut -d ' ' -f 1,2 /etc/ssh/ssh_host_ed25519_key.pub").strip()
        offered = client.succeed("ssh-keyscan server 2>/dev/null | cut -d ' ' -f 2,3").split()
        assert " ".join(offered) == on_disk, f"offered {offered}, on disk {on_disk}"

    with subtest("nginx keeps no visitor address"):
        client_ip = client.succeed("ip -4 -o addr show dev eth1").split()[3].split("/")[0]
        # A missing file (log_not_found) and a too large body (level "error"): nginx would log
        # each with ", client: <address>".
        assert http_status("http://server/no-such-page") == "404"
        assert http_status("http://server/", "-X POST -H 'Content-Length: 20000000'") == "413"
        server.succeed("journalctl --sync")
        journal = server.succeed("journalctl -u nginx.service -o cat")
        assert "client:" not in journal and client_ip not in journal, journal
        access = server.succeed("cat /var/log/nginx/access.log")
        assert "/no-such-page" in access and client_ip not in access, access
  '';
}
