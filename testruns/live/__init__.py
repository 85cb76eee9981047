"""What pages see while work goes on: event wire shapes (wire), publishing after commit
(publish), run and queue snapshots (snapshots), the WebSocket consumers (consumers), how a
web process hands messages to its pages (delivery), and the pub/sub channel layer (layer).

Publishing, shapes and snapshots may import only testruns.models (and libraries): snapshots
are given runs the entry point already looked up through testruns.reporting.access (a run,
or the queryset of runs a user may see). Consumers are entry points and may also import
testruns.reporting. Delivery and the layer are plumbing under the consumers: they
import Channels, channels_redis and each other only.
"""
