"""`weft ui`: the web dashboard (the aiohttp app in ``server``, pure view models in ``model``, the page
in ``static/``: plain HTML, CSS and JavaScript, no build step)."""
