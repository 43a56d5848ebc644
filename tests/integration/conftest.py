from daemons import make_daemon, pytest_runtest_makereport  # noqa: F401 - the fixture and its hook
