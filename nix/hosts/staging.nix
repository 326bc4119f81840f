# staging: the production look-alike where changes show up first. It follows the
# nixpkgs branch nightly and keeps verbose logs; everything else is as on prod.
{
  # The NixOS release this host was first installed with. Never change it: it
  # selects the on-disk formats of stateful services (see the README).
  system.stateVersion = "26.05";

  nixosEc2.autoUpgrade.enable = true;
  nixosEc2.logging.debug = true;

  # HTTPS for a DNS name that points at this host (see modules/web.nix):
  # nixosEc2.web.domain = "staging.todo.example.org";
  # nixosEc2.web.acmeEmail = "ops@example.org";
}
