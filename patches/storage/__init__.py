"""Storage methods (stage ``storage``): how kept tokens are stored. Importing this package registers them."""
