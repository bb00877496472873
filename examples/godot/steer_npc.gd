# Talk to a steer NPC from Godot 4 with HTTPRequest (no plugins).
#
# Add this script to a Node, set server_url and npc_id, then:
#     $SteerNpc.say("Can you fix my sword?", {"humor": 1})
#     var reply = await $SteerNpc.replied     # reply.content, reply.clamped, reply.safety
# The server runs `steer serve --policy DIR --npcs DIR` (docs/npc.md). The session id is saved in
# user://steer_sessions.cfg so the conversation resumes after the game restarts.
extends Node

signal replied(reply: Dictionary)
signal failed(message: String)

@export var server_url := "http://127.0.0.1:8000"
@export var npc_id := "brom"
@export var api_key := ""       # set when the server runs with --api-key
@export var seed := 7           # -1: a new line every time
@export var player_name := "Ana"

const SAVE := "user://steer_sessions.cfg"
var session_id := ""


func _headers() -> PackedStringArray:
	var headers := PackedStringArray(["Content-Type: application/json"])
	if api_key != "":
		headers.append("Authorization: Bearer " + api_key)
	return headers


# POST json to path; returns [status, parsed body], waiting out 429/503 with Retry-After.
func _post(path: String, body: Dictionary) -> Array:
	for attempt in 5:
		var http := HTTPRequest.new()
		add_child(http)
		http.request(server_url + path, _headers(), HTTPClient.METHOD_POST, JSON.stringify(body))
		var result: Array = await http.request_completed   # [result, code, headers, body]
		http.queue_free()
		var code: int = result[1]
		var data = JSON.parse_string(result[3].get_string_from_utf8())
		if code == 429 or code == 503:
			for header in result[2]:
				if header.to_lower().begins_with("retry-after:"):
					await get_tree().create_timer(float(header.split(":")[1])).timeout
					break
			continue
		return [code, data]
	return [429, {"error": {"message": "the dialogue server stayed busy"}}]


func _ensure_session() -> bool:
	var config := ConfigFile.new()
	config.load(SAVE)
	session_id = config.get_value("sessions", npc_id, "")
	if session_id != "":
		return true
	var body := {"player_name": player_name}
	if seed >= 0:
		body["seed"] = seed
	var answer := await _post("/v1/npcs/%s/sessions" % npc_id, body)
	if answer[0] != 201:
		failed.emit(answer[1]["error"]["message"])
		return false
	session_id = answer[1]["id"]
	config.set_value("sessions", npc_id, session_id)
	config.save(SAVE)
	return true


# The player's line in; emits `replied` with the NPC's reply (attributes are clamped to its bounds).
func say(player_line: String, mood: Dictionary = {}) -> void:
	if not await _ensure_session():
		return
	var body := {"content": player_line}
	if not mood.is_empty():
		body["attributes"] = mood
	var answer := await _post("/v1/sessions/%s/messages" % session_id, body)
	if answer[0] == 200:
		replied.emit(answer[1])
	else:
		if answer[0] == 404:   # the session was deleted: the next line starts a new one
			var config := ConfigFile.new()
			config.load(SAVE)
			config.erase_section_key("sessions", npc_id)
			config.save(SAVE)
		failed.emit(answer[1]["error"]["message"])
