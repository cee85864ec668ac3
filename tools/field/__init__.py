"""Field tools: flash, deploy, provision, logs, doctor — what a field engineer runs on site to
put firmware, files and secrets on ESP32 nodes and to find out why a board does not answer."""
