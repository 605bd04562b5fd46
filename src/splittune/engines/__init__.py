"""Where parties execute (DESIGN.md: engine): ``local`` builds the server in this process and joins clients to it by
local channels; ``ray`` puts the server's trunk in a Ray actor and joins clients to it by Ray channels."""
