# ESP32 start-up, before main.py: quiet the IDF log on the console UART, full clock speed, a
# clean heap. Nothing to do on the unix port (the simulator runs main.py directly).

import sys

if sys.platform == "esp32":
    import gc

    import esp
    import machine

    esp.osdebug(None)
    machine.freq(240000000)
    gc.collect()
