# nginx serving the TODO page, /healthz for the deploy step, and optional HTTPS.
{ config, lib, ... }:
let
  cfg = config.nixosEc2.web;
  debugLogging = config.nixosEc2.logging.debug;
  https = cfg.domain != null;

  locations = {
    "/".extraConfig = ''
      # A new deploy must show up on the next reload, not after a cache expires.
      add_header Cache-Control "no-cache" always;
      add_header X-Content-Type-Options "nosniff" always;
      add_header Referrer-Policy "no-referrer" always;
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
        Public DNS name of this host. When set, nginx obtains a Let's Encrypt
        certificate for it (HTTP-01 challenge on port 80), serves the page over
        HTTPS on port 443 and redirects plain HTTP there. The name must already
        resolve to the instance's public address, or the certificate request fails.
      '';
    };
    acmeEmail = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "ops@example.org";
      description = "Contact address registered with Let's Encrypt; required with `domain`.";
    };
  };

  config = {
    assertions = [
      {
        assertion = https -> cfg.acmeEmail != null;
        message = "nixosEc2.web.domain is set to ${toString cfg.domain}: set nixosEc2.web.acmeEmail as well, the address Let's Encrypt registers the certificate to.";
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
          serverName = if https then cfg.domain else "_";
          root = ../www;
          enableACME = https;
          forceSSL = https;
          inherit locations;
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
          inherit locations;
        };
      };
    };

    security.acme = lib.mkIf https {
      acceptTerms = true;
      defaults.email = cfg.acmeEmail;
    };
  };
}
