# The Nix daemon on the server: the deploy step evaluates the flake on the host.
{
  nix = {
    settings = {
      # The stock AMI lacks these, so the first deploy passes them on the command
      # line; from then on the host can run `nixos-rebuild --flake` by itself.
      experimental-features = [
        "nix-command"
        "flakes"
      ];
      # Collect garbage during a build once free space drops under 1 GiB, until
      # 4 GiB are free: a rebuild on a small root volume does not fail for space.
      min-free = 1024 * 1024 * 1024;
      max-free = 4 * 1024 * 1024 * 1024;
    };

    # Keeps the generations of the last 30 days (and always the current one), so a
    # rollback right after a deploy still has the previous system to go back to.
    gc = {
      automatic = true;
      dates = "weekly";
      randomizedDelaySec = "1h";
      options = "--delete-older-than 30d";
    };
    optimise.automatic = true;
  };
}
