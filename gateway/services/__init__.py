"""Services: the logic behind the routes. They never import FastAPI."""
