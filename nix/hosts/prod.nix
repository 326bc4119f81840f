# prod: changes only through a deploy of a reviewed commit (no unattended
# upgrades), and keeps info-level logs without visitor addresses. Those are the
# defaults of ../modules, so this file holds only what belongs to the host.
{
  # The NixOS release this host was first installed with. Never change it: it
  # selects the on-disk formats of stateful services (see the README).
  system.stateVersion = "26.05";

  # HTTPS for a DNS name that points at this host (see modules/web.nix):
  # nixosEc2.web.domain = "todo.example.org";
  # nixosEc2.web.acmeEmail = "ops@example.org";
}
