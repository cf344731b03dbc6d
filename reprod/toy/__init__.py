"""Making the toy world's assets: toy foundation models, their gates, the toy sweep."""
