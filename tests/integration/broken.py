"""Predictor sources for the failure tests, each broken in one way."""

OK = '''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return {"ok": True}
'''

SLOW = '''
import time


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        time.sleep(payload.get("sleep", 0))
        return {"slept": payload.get("sleep", 0)}
'''

BROKEN = {
    "syntax": ('''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload)
        return 1
''', r"syntax error", 6),
    "importerr": ('''
import no_such_module_anywhere


class PythonPredictor:
    def predict(self, payload):
        return 1
''', r"No module named 'no_such_module_anywhere'", 2),
    "noclass": ('''
class SomethingElse:
    def predict(self, payload):
        return 1
''', r"no class named PythonPredictor", None),
    "badsig": ('''
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, request_body):
        return 1
''', r"predict\(\) asks for 'request_body'; allowed: payload, query_params, headers", 6),
    "initraise": ('''
class PythonPredictor:
    def __init__(self, config):
        raise RuntimeError("weights missing")

    def predict(self, payload):
        return 1
''', r"__init__ raised RuntimeError: weights missing", 4),
}

HANG = '''
import threading


class PythonPredictor:
    def __init__(self, config):
        threading.Event().wait()  # never set: an __init__ that never returns

    def predict(self, payload):
        return 1
'''

EXIT = '''
import os


class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        if payload.get("die"):
            os._exit(3)
        return {"alive": True}
'''
