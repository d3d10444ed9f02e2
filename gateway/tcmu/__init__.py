"""The target_core_user side: ring, device loop, simulated kernel, netlink, uio, D-Bus, handler."""
