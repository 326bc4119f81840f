# nginx serving the TODO page, /healthz for the deploy step, optional HTTPS, and optionally nginx's
# status page on /admin behind HTTP basic auth, whose password file is a host secret.
{ config, lib, ... }:
let
  cfg = config.nixosEc2.web;

  # The host secret that holds /admin's users: an htpasswd file (nixos-ec2:secret.webAdmin).
  adminSecret = "webAdmin";
  # Where systemd puts it for nginx: LoadCredential= (nix/modules/secrets.nix) copies it into the
  # unit's credentials directory, readable by nginx's own user (systemd src/core/exec-credential.c:
  # <runtime directory>/credentials/<unit>/<id>). nginx reads the file on every request.
  adminUsersFile = "/run/credentials/nginx.service/${adminSecret}";
  # nginx's connection counters (ngx_http_stub_status_module), for the admins only.
  adminLocation = {
    "= /admin" = {
      extraConfig = ''
        auth_basic "nixos-ec2 admin";
        auth_basic_user_file ${adminUsersFile};
        stub_status;
        access_log off;
      '';
    };
  };
  debugLogging = config.nixosEc2.logging.debug;
  https = cfg.domain != null;
  domain = toString cfg.domain;

  # nixos/modules/security/acme/default.nix: acme-<cert>.service installs a self-signed
  # placeholder in /var/lib/acme/<cert> and acme-order-renew-<cert>.service orders the real
  # certificate (lego); an order that fails, as it does until DNS points the name at this host,
  # exits 10 and leaves the unit failed, and only the daily acme-renew-<cert>.timer (24 h random
  # delay) would try again. The first real certificate leaves `acme-success` in that directory
  # for good. The nginx module names the certificate after the vhost's serverName.
  realCertificate = "/var/lib/acme/${domain}/acme-success";
  orderUnit = "acme-order-renew-${domain}.service";
  retryUnit = "nixos-ec2-acme-retry";

  # The retry backs off. Let's Encrypt counts every failed order against the name and account
  # (letsencrypt/website, content/en/docs/rate-limits.md; the second limit since 2024-12):
  # - "Authorization Failures per Hostname per Account": 5 an hour, refilling 1 every 12
  #   minutes. At most 4 retries an hour (every 15 minutes, the RestartSec that nixpkgs' acme
  #   module picks for the same limit) leave the fifth to the ACME module's own order at boot or
  #   deploy; every 12 minutes made that 6 in the first hour.
  # - "Consecutive Authorization Failures per Hostname per Account": 3,600, refilling 1 a day;
  #   past that the name is paused for the account until someone unpauses it by hand. 120
  #   orders a day (every 12 minutes, without end) got there in about a month.
  # The schedule: every 15 minutes for 6 hours (24 orders; a name that starts resolving then
  # gets its certificate within about 15 minutes), hourly until a day (18), every 6 hours until
  # 30 days (116), then none: 158 failures in 30 days, about 190 with the daily renewal, some
  # 5 % of the 3,600. Afterwards only acme-renew-<cert>.timer orders, once a day, as fast as
  # the limit refills, so the name is never paused. test/web.test.ts runs it through 31 days.
  minute = 60;
  hour = 60 * minute;
  day = 24 * hour;
  retryTick = 15 * minute;
  retryCalendar = "*:0/${toString (retryTick / minute)}";
  retryGiveUpAfter = 30 * day;
  # Each phase: while the first failed order is less than `before` seconds ago, order `every`
  # seconds.
  retrySchedule = [
    {
      before = 6 * hour;
      every = retryTick;
    }
    {
      before = day;
      every = hour;
    }
    {
      before = retryGiveUpAfter;
      every = 6 * hour;
    }
  ];
  # An order is due from half a tick before `every` has passed, so that a tick that fired a
  # little late (the timer's AccuracySec) does not push the next order a whole tick back.
  retrySlack = retryTick / 2;
  # The retry unit's StateDirectory (systemd makes it). The files hold seconds since the epoch:
  # when the retry first found no certificate (within a tick of the first failed order), and
  # when it last started an order. Named for the domain, so that a new name starts afresh.
  retryStateDir = "/var/lib/${retryUnit}";
  firstFailureFile = "${retryStateDir}/${domain}.first-failure";
  lastOrderFile = "${retryStateDir}/${domain}.last-order";
  retryEveryByAge = lib.concatMapStringsSep "\nel" (
    phase: ''if [ "$age" -lt ${toString phase.before} ]; then every=${toString phase.every}''
  ) retrySchedule;

  isDnsName =
    name:
    builtins.match "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?([.][a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+" name
    != null;

  # Plain HTTP keeps serving the page until a real certificate exists, because HTTPS offers
  # only the self-signed placeholder before that; from then on HTTP redirects to HTTPS. The file
  # test runs per request (ngx_http_rewrite_module `if -f`), so no reload is needed for it.
  # nginx's `if` has no "and": the variable carries the scheme and, with the certificate, a mark.
  httpsOnceCertified = ''
    set $nixos_ec2_https $scheme;
    if (-f ${realCertificate}) {
      set $nixos_ec2_https "$scheme+certified";
    }
  '';

  # `redirect`: send plain HTTP to HTTPS once the certificate is in place (see above). To the
  # configured name, not $host: this is the default server, so a visitor who came by the
  # address (the stack's `url` output is http://<address>/) would be sent to https://<address>/,
  # which the certificate does not name.
  locationsWith = redirect: {
    "/".extraConfig = ''
      # A new deploy must show up on the next reload, not after a cache expires.
      add_header Cache-Control "no-cache" always;
      add_header X-Content-Type-Options "nosniff" always;
      add_header Referrer-Policy "no-referrer" always;
    ''
    + lib.optionalString redirect ''
      if ($nixos_ec2_https = "http+certified") {
        return 301 https://${domain}$request_uri;
      }
    '';
    "= /healthz" = {
      return = ''200 "ok\n"'';
      extraConfig = ''
        default_type text/plain;
        access_log off;
      '';
    };
  };
in
{
  options.nixosEc2.web = {
    domain = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "todo.example.org";
      description = ''
        Public DNS name of this host (lowercase). When set, nginx obtains a Let's Encrypt
        certificate for it (HTTP-01 challenge on port 80) and serves the page over HTTPS on
        port 443 as well. Until the name resolves to the instance's public address the order
        fails; the page stays on plain HTTP, the order is retried every 15 minutes for the
        first 6 hours, then less often (hourly until a day, every 6 hours until 30 days, then
        only by the ACME module's daily renewal), and once the certificate is in place plain
        HTTP redirects to https://<domain>/.
      '';
    };
    acmeEmail = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "ops@example.org";
      description = "Contact address registered with Let's Encrypt; required with `domain`.";
    };
    admin.enable = lib.mkEnableOption ''
      nginx's status page on /admin, behind HTTP basic auth. Its users are the host secret
      webAdmin, an htpasswd file (`admin:<hash from openssl passwd -6>` per line) that the stack
      gives this host: nixos-ec2:hostSecrets names the host for webAdmin and
      nixos-ec2:secret.webAdmin holds the file'';
  };

  config = {
    nixosEc2.secrets = lib.mkIf cfg.admin.enable {
      ${adminSecret}.restartUnits = [ "nginx.service" ];
    };

    assertions = [
      {
        assertion = https -> cfg.acmeEmail != null;
        message = "nixosEc2.web.domain is set to ${domain}: set nixosEc2.web.acmeEmail as well, the address Let's Encrypt registers the certificate to.";
      }
      {
        # It ends up in unit names, paths, nginx's configuration and shell scripts.
        assertion = https -> isDnsName domain;
        message = "nixosEc2.web.domain is ${builtins.toJSON domain}: give a lowercase DNS name with at least one dot, such as todo.example.org.";
      }
    ];

    services.nginx = {
      enable = true;
      recommendedTlsSettings = true;
      recommendedProxySettings = true;
      recommendedOptimisation = true;
      recommendedGzipSettings = true;
      serverTokens = false;

      # nginx appends ", client: <address>" to whatever it logs about a request or connection
      # (ngx_http_log_error). A missing file, a too large body or a refused request is logged at
      # "error", and a TLS handshake failure nginx does not recognise at "crit"
      # (ngx_ssl_connection_error), so both levels would keep visitors' addresses. From "alert"
      # up nginx reports its own failures (a worker that died, no memory, too many open files).
      # Staging (debug logging) keeps the module's default, "stderr" at level "error".
      logError = lib.mkIf (!debugLogging) "stderr alert";

      commonHttpConfig = ''
        # A missing file is already a 404 line in the access log.
        log_not_found off;
      ''
      + lib.optionalString (!debugLogging) ''
        log_format without_address '$time_iso8601 "$request" $status $body_bytes_sent "$http_user_agent"';
        access_log /var/log/nginx/access.log without_address;
      '';

      virtualHosts = {
        todo = {
          default = true;
          serverName = if https then domain else "_";
          root = ../www;
          enableACME = https;
          # Both schemes, not forceSSL: forceSSL redirects every plain HTTP request to HTTPS at
          # once, also while HTTPS has only the self-signed placeholder to offer.
          addSSL = https;
          locations = locationsWith https // lib.optionalAttrs cfg.admin.enable adminLocation;
          extraConfig = lib.optionalString https httpsOnceCertified;
        };

        # The deploy step checks http://127.0.0.1/healthz on the host. With HTTPS on,
        # the public vhost answers plain HTTP with a redirect, so loopback gets its
        # own plain-HTTP server (nginx prefers an exact address over a wildcard).
        loopback = {
          listen = [
            {
              addr = "127.0.0.1";
              port = 80;
            }
          ];
          root = ../www;
          locations = locationsWith false;
        };
      };
    };

    security.acme = lib.mkIf https {
      acceptTerms = true;
      defaults.email = cfg.acmeEmail;
    };

    # Orders the certificate again while none has been issued, so that it arrives soon after DNS
    # points the name here instead of up to two days later, backing off as the schedule above
    # says. It never fails itself (the order unit reports its own failure) and stops its timer
    # once the certificate exists or the schedule ends; renewals stay with
    # acme-renew-<cert>.timer.
    systemd.services = lib.mkIf https {
      ${retryUnit} = {
        description = "Order the certificate for ${domain} again until one is issued";
        startAt = retryCalendar;
        serviceConfig = {
          Type = "oneshot";
          StateDirectory = retryUnit;
        };
        script = ''
          now=$(date +%s)
          if [ -e ${realCertificate} ]; then
            rm -f ${firstFailureFile} ${lastOrderFile}
            echo "nixos-ec2: the certificate for ${domain} is in place; stopping ${retryUnit}.timer (acme-renew-${domain}.timer renews it)"
            systemctl stop --no-block ${retryUnit}.timer
            exit 0
          fi

          # A missing file, one cut short, or a time ahead of the clock starts afresh.
          first="" last=""
          if [ -s ${firstFailureFile} ]; then read -r first <${firstFailureFile} || true; fi
          if [ -s ${lastOrderFile} ]; then read -r last <${lastOrderFile} || true; fi
          if ! [[ $first =~ ^[0-9]+$ ]] || [ "$first" -gt "$now" ]; then
            first=$now
            echo "$first" >${firstFailureFile}
          fi
          if ! [[ $last =~ ^[0-9]+$ ]] || [ "$last" -gt "$now" ]; then
            last=0
          fi
          age=$((now - first))

          if [ "$age" -ge ${toString retryGiveUpAfter} ]; then
            echo "nixos-ec2: no certificate for ${domain} $((age / ${toString day})) days after the first failed order (${firstFailureFile}): no more retries, stopping ${retryUnit}.timer; acme-renew-${domain}.timer still orders once a day. Once ${domain} resolves to this host, order it now: systemctl start ${orderUnit}"
            systemctl stop --no-block ${retryUnit}.timer
            exit 0
          fi

          ${retryEveryByAge}
          fi
          due=$((last + every - ${toString retrySlack}))
          if [ "$now" -lt "$due" ]; then
            echo "nixos-ec2: no certificate for ${domain} yet, $((age / ${toString minute})) min after the first failed order; ordering every $((every / ${toString minute})) min now, the next order in about $(( (due - now + ${toString (minute - 1)}) / ${toString minute} )) min"
            exit 0
          fi
          echo "$now" >${lastOrderFile}
          echo "nixos-ec2: no certificate for ${domain} yet (no ${realCertificate}): starting ${orderUnit} again, $((age / ${toString minute})) min after the first failed order (ordering every $((every / ${toString minute})) min now); it fails with exit status 10 until ${domain} resolves to this host"
          systemctl start --no-block ${orderUnit}
        '';
      };
    };
  };
}
