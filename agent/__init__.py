"""edgectl-agent: runs TFLite models delivered over MQTT on a small board (numpy, paho-mqtt and a
TFLite runtime only). Entry point: :func:`agent.main.main`."""
