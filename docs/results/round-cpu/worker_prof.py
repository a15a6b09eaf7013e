import cProfile, pstats, signal, sys, time, os
from halollm.cli.main import main
prof = cProfile.Profile(time.process_time)
def stop(*_):
    prof.disable(); prof.dump_stats("/tmp/prof/w.prof"); os._exit(0)
signal.signal(signal.SIGTERM, stop)
prof.enable()
sys.argv = ["halo", "worker"] + sys.argv[1:]
try:
    main()
finally:
    stop()
