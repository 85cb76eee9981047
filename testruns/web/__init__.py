"""The pages: views, forms and charts. Thin adapters over engine and reporting services.

May import everything below it; nothing imports it but urls.
"""
