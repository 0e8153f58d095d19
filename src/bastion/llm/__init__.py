"""Language models: the OpenAI-compatible front end, backends and the guards around them."""

import logging

# httpx logs every request at INFO (the backends' calls: several per chat request); an attacker
# could multiply the log with them. Warnings and errors still show.
logging.getLogger("httpx").setLevel(logging.WARNING)
