"""The paper's tables (CSV + Markdown) and plots."""
