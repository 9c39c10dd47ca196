// Starts Swagger UI on the served OpenAPI document. A file, not an inline
// script, so the page keeps its Content-Security-Policy (script-src 'self').
// validatorUrl: null turns off Swagger UI's badge, which would ask a public
// validator service about the document.
"use strict";
window.ui = window.SwaggerUIBundle({
  url: "/schema/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  tryItOutEnabled: false,
  onComplete: function () {
    document.body.dataset.ready = "true";
  },
});
