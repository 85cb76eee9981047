"""Notifications about finished runs: what a notice says (messages), how it goes out
(channels: a signed JSON webhook, a Slack-compatible incoming webhook, e-mail through Django's
mail settings) and delivering it once, with its attempts logged and retried with backoff
through Dramatiq (delivering, called by actors.deliver_notification).

The engine creates the deliveries when it settles a finished run (engine.settling) and sends
their messages by actor name; what changed comes from reporting.run_changes.

May import: testruns.reporting, testruns.engine (counters, dispatch), testruns.catalog,
testruns.models. Only the actors and the entry points import it.
"""
