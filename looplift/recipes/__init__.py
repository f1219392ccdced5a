"""End-to-end tasks built on looplift."""
