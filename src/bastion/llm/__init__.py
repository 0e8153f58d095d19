"""Language models: the OpenAI-compatible front end, backends and the guards around them."""
