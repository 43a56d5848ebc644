from daemons import make_daemon  # noqa: F401 - the fixture every integration test uses
