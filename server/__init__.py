"""edgectl-server: the fleet host (HTTP API for workstations, MQTT side for devices, SQL store)."""

__version__ = "0.1.0"
