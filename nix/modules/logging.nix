# How much the server logs and for how long.
{ config, lib, ... }:
let
  cfg = config.nixosEc2.logging;
in
{
  options.nixosEc2.logging.debug = lib.mkOption {
    type = lib.types.bool;
    default = false;
    description = ''
      Keep debug-level messages in the journal and visitors' IP addresses in the
      nginx access log. Meant for staging, where logs are read to find problems;
      production keeps neither: less noise, and no personal data at rest.
    '';
  };

  # Bounded, so that logs never crowd out the Nix store on a small root volume.
  config.services.journald.extraConfig = ''
    SystemMaxUse=512M
    SystemKeepFree=1G
    MaxRetentionSec=30day
    MaxLevelStore=${if cfg.debug then "debug" else "info"}
  '';
}
