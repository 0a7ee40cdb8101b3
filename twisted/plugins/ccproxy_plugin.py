"""twistd plugin: `twistd -n ccproxy --config PATH`.

Only names the module as a string so that `twistd --help` imports nothing heavy.
"""

from twisted.application.service import ServiceMaker

ccproxy = ServiceMaker(
    "ccproxy",
    "ccproxy.tap",
    "Security proxy for the Anthropic and OpenAI HTTP APIs",
    "ccproxy",
)
