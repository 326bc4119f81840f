# Boots the server configuration without its EC2-only module and checks it from a
# second machine, as a visitor (or an attacker) sees it. `server` has prod's settings (the
# modules' defaults); `staging` has staging's, and a domain whose certificate stays pending:
# the test network has no DNS and no way to Let's Encrypt. Needs Linux with KVM:
# `nix flake check` runs it as checks.<system>.web.
{ pkgs, sopsModule }:
let
  domain = "staging.todo.example.org";
  # /admin's one user on `staging`, as the host secret webAdmin would hold it (an htpasswd line;
  # openssl passwd -apr1 -salt nixosec2 'correct horse battery staple').
  adminPassword = "correct horse battery staple";
  adminUsers = "admin:$apr1$nixosec2$qF0Bow0hFrRx5a8nbot01/";
in
pkgs.testers.runNixOSTest {
  name = "nixos-ec2-web";

  nodes = {
    server =
      { pkgs, ... }:
      {
        # Every module of a deployed server except the EC2 image, which expects EC2's
        # disks and metadata service.
        imports = [
          ../modules
          sopsModule
        ];
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

    staging =
      { config, lib, ... }:
      {
        imports = [
          ../modules
          sopsModule
        ];
        disabledModules = [ ../modules/ec2.nix ];

        # What nix/hosts/staging.nix turns on.
        nixosEc2.logging.debug = true;
        nixosEc2.autoUpgrade.enable = true;
        nixosEc2.flake = {
          source = "/nonexistent-flake";
          attr = "staging";
        };
        # The test starts the upgrade itself; the timer must not (a date long past never comes).
        system.autoUpgrade.dates = lib.mkForce "2000-01-01";

        nixosEc2.web = {
          inherit domain;
          acmeEmail = "ops@example.org";
          admin.enable = true;
        };
        # What a deploy would have written there (deploy/remote-switch.sh), before nginx starts.
        systemd.tmpfiles.rules = [ "f ${config.nixosEc2.secrets.webAdmin.path} 0400 root root - ${adminUsers}" ];
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
    domain = "${domain}"
    certificate = f"/var/lib/acme/{domain}/acme-success"
    order = f"acme-order-renew-{domain}.service"
    retry = "nixos-ec2-acme-retry"
    first_failure = f"/var/lib/{retry}/{domain}.first-failure"
    last_order = f"/var/lib/{retry}/{domain}.last-order"
    day = 24 * 60 * 60
    upgrade = "nixos-upgrade.service"


    def unit_property(machine, unit, name):
        return machine.succeed(f"systemctl show -P {name} {unit}").strip()


    def http_status(url, options=""):
        return client.succeed(f"curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}' {options} {url}").strip()


    start_all()
    server.wait_for_unit("nginx.service")
    server.wait_for_unit("sshd.service")
    server.wait_for_open_port(80)
    server.wait_for_open_port(22)
    server.wait_for_open_port(8080)
    staging.wait_for_unit("nginx.service")
    staging.wait_for_open_port(80)
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

    with subtest("nginx keeps no visitor address on prod; staging (debug logging) does"):
        client_ip = client.succeed("ip -4 -o addr show dev eth1").split()[3].split("/")[0]
        for node in ("server", "staging"):
            # A missing file (log_not_found) and a too large body (level "error"): nginx would
            # log each with ", client: <address>".
            assert http_status(f"http://{node}/no-such-page") == "404"
            assert http_status(f"http://{node}/", "-X POST -H 'Content-Length: 20000000'") == "413"
        # The same check sees such lines where the level lets them through...
        staging.wait_until_succeeds(
            "journalctl -u nginx.service -o cat"
            + f" | grep 'client intended to send too large body' | grep -qF 'client: {client_ip}'"
        )
        staging.fail("journalctl -u nginx.service -o cat | grep -F no-such-page")
        # ...and finds none on prod.
        server.succeed("journalctl --sync")
        journal = server.succeed("journalctl -u nginx.service -o cat")
        assert "client:" not in journal and client_ip not in journal, journal
        access = server.succeed("cat /var/log/nginx/access.log")
        assert "/no-such-page" in access and client_ip not in access, access

    with subtest("/admin answers only the user of the host secret, which nginx reads as its credential"):
        assert http_status("http://staging/admin") == "401"
        assert http_status("http://staging/admin", "-u admin:wrong") == "401"
        status = client.succeed("curl -fsS -u 'admin:${adminPassword}' http://staging/admin")
        assert "Active connections" in status, status
        staging.succeed("test -s /run/credentials/nginx.service/webAdmin")
        assert http_status("http://server/admin") == "404"

    with subtest("a domain that does not resolve here: the order fails with 10, HTTP keeps serving"):
        staging.wait_until_succeeds(f"systemctl show -P ActiveState {order} | grep -qx failed", timeout=180)
        assert unit_property(staging, order, "Result") == "exit-code"
        assert unit_property(staging, order, "ExecMainStatus") == "10"
        staging.succeed(f"systemctl is-active acme-{domain}.service")
        staging.fail(f"test -e {certificate}")
        staging.succeed(f"systemctl is-active {retry}.timer")
        page = client.succeed("curl -fsS http://staging/")
        assert "<title>TODO</title>" in page, page
        assert client.succeed("curl -fsS http://staging/healthz") == "ok\n"
        assert staging.succeed("curl -fsS http://127.0.0.1/healthz") == "ok\n"
        # Meanwhile HTTPS offers the self-signed placeholder, which no client trusts.
        client.fail("curl -fsS https://staging/")
        assert "<title>TODO</title>" in client.succeed("curl -fsSk https://staging/")

    with subtest("while no certificate exists, the retry unit orders it again, less often as days pass"):
        # The test runs the retry itself, with its state set back in time; the timer must not
        # tick in between.
        staging.succeed(f"systemctl stop {retry}.timer")
        staging.succeed(f"mkdir -p /var/lib/{retry}")
        now = int(staging.succeed("date +%s"))

        # 10 minutes after the first failure, 15 after the last order: every 15 minutes, due.
        staging.succeed(f"echo {now - 600} > {first_failure} && echo {now - 900} > {last_order}")
        started = unit_property(staging, order, "ExecMainStartTimestampMonotonic")
        staging.succeed(f"systemctl start {retry}.service")
        assert unit_property(staging, f"{retry}.service", "Result") == "success"
        staging.wait_until_succeeds(
            f"test \"$(systemctl show -P ExecMainStartTimestampMonotonic {order})\" != {started}"
        )
        staging.wait_until_succeeds(f"systemctl show -P ActiveState {order} | grep -qx failed", timeout=180)
        staging.succeed(f"journalctl -u {retry}.service -o cat | grep -qF 'no certificate for {domain} yet (no {certificate})'")

        # Two days after the first failure: every 6 hours, so not 2 hours after the last order.
        staging.succeed(f"echo {now - 2 * day} > {first_failure} && echo {now - 2 * 60 * 60} > {last_order}")
        started = unit_property(staging, order, "ExecMainStartTimestampMonotonic")
        staging.succeed(f"systemctl start {retry}.service")
        assert unit_property(staging, f"{retry}.service", "Result") == "success"
        staging.succeed(f"journalctl -u {retry}.service -o cat | grep -qF 'ordering every 360 min now, the next order in about'")
        assert unit_property(staging, order, "ExecMainStartTimestampMonotonic") == started

        # 30 days after the first failure: no more retries, and the timer stops.
        staging.succeed(f"systemctl start {retry}.timer")
        staging.succeed(f"echo {now - 30 * day} > {first_failure}")
        staging.succeed(f"systemctl start {retry}.service")
        staging.wait_until_fails(f"systemctl is-active {retry}.timer")
        staging.succeed(f"journalctl -u {retry}.service -o cat | grep -qF 'no more retries'")
        assert unit_property(staging, order, "ExecMainStartTimestampMonotonic") == started
        # Back to the first hours, the timer on, for the next subtest.
        staging.succeed(f"echo {now} > {first_failure} && systemctl start {retry}.timer")

    with subtest("once a certificate exists, plain HTTP redirects to HTTPS and the retries stop"):
        staging.succeed(f"touch {certificate}")
        # To the configured name, not the name or address the visitor used.
        assert http_status("http://staging/") == f"301 https://{domain}/"
        assert client.succeed("curl -fsS http://staging/healthz") == "ok\n"
        assert staging.succeed("curl -fsS http://127.0.0.1/healthz") == "ok\n"
        started = unit_property(staging, order, "ExecMainStartTimestampMonotonic")
        staging.succeed(f"systemctl start {retry}.service")
        staging.wait_until_fails(f"systemctl is-active {retry}.timer")
        assert unit_property(staging, order, "ExecMainStartTimestampMonotonic") == started
        # The schedule's state goes with the retries.
        staging.fail(f"test -e {first_failure} || test -e {last_order}")

    with subtest("the nightly upgrade on a host never deployed makes the deploy's state directory"):
        staging.succeed("rm -rf /var/lib/nixos-ec2")
        # The rebuild itself fails here (its flake does not exist): the preamble must get past the lock.
        staging.execute(f"systemctl start {upgrade}")
        staging.succeed(f"journalctl -u {upgrade} -o cat | grep -qF 'holding /var/lib/nixos-ec2/lock until this upgrade ends'")
        assert staging.succeed("stat -c %a /var/lib/nixos-ec2").strip() == "700"
        staging.succeed(f"systemctl reset-failed {upgrade}")

    with subtest("the nightly upgrade skips, and succeeds, while a deploy awaits its confirmation"):
        staging.succeed("mkdir -p /var/lib/nixos-ec2 && echo 'test-deploy 41' > /var/lib/nixos-ec2/pending-rollback")
        staging.succeed(f"systemctl start {upgrade}")
        assert unit_property(staging, upgrade, "Result") == "success"
        staging.succeed(
            f"journalctl -u {upgrade} -o cat | grep -qF"
            + " 'a deploy is waiting for its confirmation (/var/lib/nixos-ec2/pending-rollback: test-deploy 41)'"
        )

    with subtest("the nightly upgrade waits for the lock that a deploy holds"):
        staging.succeed(
            "systemd-run --unit=test-deploy-lock ${pkgs.util-linux}/bin/flock /var/lib/nixos-ec2/lock sleep 600"
        )
        staging.succeed(f"systemctl start --no-block {upgrade}")
        staging.wait_until_succeeds(
            f"journalctl -u {upgrade} -o cat | grep -qF 'holds /var/lib/nixos-ec2/lock; waiting up to 600 s'"
        )
        assert unit_property(staging, upgrade, "ActiveState") == "activating"
        staging.succeed("systemctl stop test-deploy-lock.service")
        staging.wait_until_succeeds(f"systemctl show -P ActiveState {upgrade} | grep -qx inactive")
        assert unit_property(staging, upgrade, "Result") == "success"
        skipped = staging.succeed(f"journalctl -u {upgrade} -o cat | grep -c 'a deploy is waiting for its confirmation'")
        assert skipped.strip() == "2", skipped
  '';
}
