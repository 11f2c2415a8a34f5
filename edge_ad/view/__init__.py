"""The live view: a small web page served by edge-ad itself (`--http`), for the person standing at the line.

It shows the latest frame with its heatmap, the score over the last minutes, the last alerts and the
status, and lets the operator draw the inspection region (ROI). Nothing is rendered without a viewer:
the pipeline only hands over references (`frames.CameraView.observe`); JPEGs are made per request.
Standard library only (`http.server`), static files shipped in the package: no build step, no CDN.
"""
