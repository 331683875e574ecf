"""Where a newcomer starts: the procedural spine phantom (``phantom``) and the unattended loop (``loop``)."""
