"""What operators run and watch: the status file and live view (``status``, ``live``, ``stats``),
Prometheus metrics (``metrics``), operator commands (``admin``), calibration (``calibrate``) and the
event stream's command line (``events``)."""
