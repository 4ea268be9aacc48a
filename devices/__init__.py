"""Device profiles shipped with edgectl (``devices/profiles/*.toml``), read by
:mod:`sdk.protocol.profiles`. A package only so that the profiles install with the wheel."""
