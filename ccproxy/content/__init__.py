"""What goes in and what comes out: request validation, content filtering and response masking.

The layer lives in `ccproxy.content.layer`; this package's own import stays light, because the config
package imports the masking modules here to check patterns while it loads.
"""
