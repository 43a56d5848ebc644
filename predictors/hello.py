"""The smallest predictor: takes a JSON payload, returns a string.

    curl -X POST localhost:8080/hello -H 'Content-Type: application/json' -d '{"name": "Ada"}'
"""


class PythonPredictor:
    def __init__(self, config):
        self.greeting = config.get("greeting", "Hello")

    def predict(self, payload):
        name = payload.get("name", "world") if isinstance(payload, dict) else "world"
        return f"{self.greeting}, {name}!"
