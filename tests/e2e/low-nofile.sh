#!/bin/sh
# Runs $FLEETGATE_REAL with a soft open-file limit of 1024, as container runtimes do.
ulimit -Sn 1024
exec "$FLEETGATE_REAL" "$@"
