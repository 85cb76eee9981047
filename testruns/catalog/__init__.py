"""What a team writes: prompt cards, their versions and cases, providers' rules, prompt
rendering, assertions and card files (import and export).

May import: testruns.models (cards.py, card_files, demo only), Django and libraries. The pure
modules (prompts, assertions, provider_rules) import no model: models.py validates with them.
"""
