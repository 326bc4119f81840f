# SSH: keys only, and never a change that locks the admin or the deploy step out.
{
  services.openssh = {
    enable = true;
    # firewall.nix opens port 22 together with every other port, from one list.
    openFirewall = false;

    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "prohibit-password";
    };

    # EC2 writes the key pair's public key to /root/.ssh/authorized_keys at boot;
    # NixOS may stop reading home-directory key files by default one day.
    authorizedKeysInHomedir = true;

    # Only the ed25519 key that user-data installed before sshd first started: it is
    # the key Pulumi generated and the deploy step pins. sshd generates a key only
    # when this file is missing, and without an RSA key it offers nothing else.
    hostKeys = [
      {
        type = "ed25519";
        path = "/etc/ssh/ssh_host_ed25519_key";
      }
    ];
  };
}
