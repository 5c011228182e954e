"""inspector plugin: a web page served by the router that shows, token by token, what the trainer will get
(sessions' trajectories, or a pasted text / message list). See ``plugin.py`` for the routes and ``static/`` for
the page (plain HTML/JS/CSS, shipped as package data: no build step, nothing fetched from the internet)."""
