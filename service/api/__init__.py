"""HTTP controllers: one module per concept, each a Controller plus its wire
Structs. No business logic lives here: handlers validate, then make one call
into the ledger."""
